"""Checks every stage shares: the one tolerance table, output comparison, and the held-out inputs.

Enters: reference and candidate outputs (numpy), or a model's input names and tokenizer. Leaves:
`compare.Comparison` records (raising `ValidationError` outside `tolerances`), and validation feeds of
real English text (`heldout_inputs`) that never overlap the calibration samples.
"""
