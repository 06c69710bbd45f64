"""Finetuning tasks on top of the pretrained model: what each adds to the one training loop.

    prompts         the Alpaca prompt template (no torch: the data stage formats with it)
    classification  a class head on the last real token or the mean of the real tokens, its loss, batches, metrics
    instruction     response-only loss batches, greedy responses, overlap scores
    trainable       which parameters receive gradients (head, last_block, all)
    batches         resumable, seeded batches of a task's rows (the pretraining sampler)
"""
