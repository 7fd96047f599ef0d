"""`npvlm label`: a folder / glob / list / manifest of images x prompts -> an append-only JSONL, resumable.

    inputs.py   what INPUT names -> an ordered list of Item(path, key, meta)
    job.py      the batch loop: done-set from the output, model.generate on left-padded batches, progress
    output.py   the line-atomic appender, the torn-line repair, and the COCO / YOLO exports
"""
