"""Tasks as data: what a task's model outputs, which outputs carry a sequence axis, how a stage is judged.

Enters: a config.json's `model_type` and `architectures`, an adapter's PEFT `task_type`, `--task`; model
outputs (numpy) and their feeds; labeled evaluation files. Leaves: a `spec.Task` per (task, family kind),
with Optimum's task names, input/output names and dynamic axes (`registry`), the task inferred through
transformers' auto-model mappings (`infer`), agreement and labeled metrics (`metrics`), task-specific
validation feeds (`feeds`) and parsed `--eval-data` records (`eval_data`). Pure: numpy and names, no
models; transformers is imported only to read its auto-model mapping names.
"""
