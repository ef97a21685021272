"""Checks every stage shares: the one tolerance table, output comparison, and the held-out inputs.

Enters: reference and candidate outputs (numpy), or a model's input names and tokenizer. Leaves:
`compare.Comparison` records (raising `ValidationError` outside `tolerances`), validation feeds of real
English text (`heldout_inputs`) prepared on the task's terms (`task_inputs`), and `--eval-data` samples
tokenized with what scores a stage against their labels (`eval_set`).
"""
