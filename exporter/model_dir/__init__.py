"""Stage 1, load: a MODEL_DIR on disk -> a checked `ModelDir` -> the masked+merged PyTorch reference.

Enters: a Hugging Face folder (config.json, safetensors or allowed pickles, optional tokenizer and
sentence-transformers pooling), pruning masks in any of the three contract forms, a PEFT LoRA adapter.
Leaves: `loader.ModelDir` (config, the task, weights under the built model's names, masks at full shape,
adapter) and `loader.build_reference_model`, the model every later stage is checked against: the task's
transformers class, head included.

Modules: `files` (JSON, safetensors, shards, pickles), `masks`, `lora`, `pooling`, `tokenizer`,
`pruned_heads` (transformers 4 prune_heads checkpoints), `loader`.
"""
