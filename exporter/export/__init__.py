"""Stage 3, export: the compact PyTorch model -> ONNX with dynamic axes.

Enters: the compact model and example feeds. Leaves: `model.exported.onnx` (`torch_to_onnx` for encoders
and cache-less causal LMs, `task_heads` for the task's head under Optimum's output names;
`decoder_with_past` for causal LMs with a KV cache and its `DecoderManifest`), made in memory and written
by a thread while it is checked where it fits in one file (`in_memory`: its bytes go on to the graph
passes), else written with one external-data file (`external_data`), and the files a deployment needs
beside it (`deploy_files`: config.json, tokenizer, generation_config.json). Rotary embeddings whose
frequencies change at run time (dynamic NTK) are traced from the positions (`rope`).
"""
