"""Training in npvlm: whole-model gradients (hand-written, layer by layer), optimisers, the loop.

    siglip_grad.py       the vision tower's forward-that-saves and backward, with the MAP head (mirrors models/siglip_vision.py)
    siglip_model_grad.py SigLIP's text tower and HF SiglipModel's sigmoid (or CLIP) loss, loss_and_grads (models/siglip.py)
    gemma_grad.py        the decoder's (mirrors models/gemma.py: Gemma 1 and Gemma 2)
    paligemma_grad.py    the training batch, HF's suffix loss, loss_and_grads (mirrors models/paligemma.py)
    optim.py             SGD and AdamW (torch's update rules), the trainable selections attention / all / lora
    schedule.py          the lr of each step: constant / linear / cosine with warm-up, as HF's get_*_schedule_with_warmup
    finetune.py          the loop over a JSONL of rows, the task interface, the options checked up front
    folder.py            writing OUT_DIR atomically: an HF model folder or a PEFT adapter folder, side files copied
    paligemma_task.py    PaliGemma as a task: (image, prefix, suffix) rows, saving an HF folder or PEFT adapters
    siglip_task.py       SigLIP as a task: (image, text) rows, the sigmoid or CLIP loss, saving an HF folder
"""
