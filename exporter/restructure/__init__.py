"""Stage 2, restructure: the masked+merged reference -> the compact model, dead structure removed.

Enters: the reference `nn.Module` (masks applied, LoRA merged). Leaves: the same module mutated into
smaller dense layers (`remove_dead.restructure`; a sublayer whose units all died is gone, `families/sublayers`),
the `plan.RestructurePlan` saying what was kept and removed per layer and the FLOPs per token that saves
(`flops`), and the compact model saved and reloadable (`compact`). Per-architecture knowledge lives in
`families/` (a registry keyed by `model_type`).
"""
