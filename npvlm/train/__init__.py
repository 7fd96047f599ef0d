"""Training in npvlm: whole-model gradients (hand-written, layer by layer), optimisers, the loop.

    siglip_grad.py      the vision tower's forward-that-saves and backward (mirrors models/siglip_vision.py)
    gemma_grad.py       the decoder's (mirrors models/gemma.py: Gemma 1 and Gemma 2)
    paligemma_grad.py   the training batch, HF's suffix loss, loss_and_grads (mirrors models/paligemma.py)
    optim.py            SGD and AdamW (torch's update rules), the trainable selections attention / all / lora
    finetune.py         the loop over a JSONL of rows, the task interface, the folder written atomically
    paligemma_task.py   PaliGemma as a task: (image, prefix, suffix) rows, saving an HF folder or PEFT adapters
"""
