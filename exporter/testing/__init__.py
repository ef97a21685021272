"""Seeded test models, outside the product's import path: tests, tools and the demo use them.

`synthetic` writes MODEL_DIRs of every family the way users hand them to us (transformers' and PEFT's own
`save_pretrained`, masks in each contract form). No product module imports this package (a test says so).
"""
