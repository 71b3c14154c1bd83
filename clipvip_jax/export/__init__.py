"""Deployable exports of a checkpoint's two encoders, and the small runtime that serves them.

  python -m clipvip_jax.export CHECKPOINT --format onnx|stablehlo --out DIR

  command.py   the command: arguments, the checks made before any work, one-sentence errors
  writer.py    the JAX side: the encoders as pure functions with the weights baked in, the folder written under a
               temporary name and swapped into place (tokenizer, preprocessing spec, manifest with checksums)
  routes.py    the two formats: ONNX through jax2onnx (docs/design.md "Deployable exports" says why that route),
               StableHLO through jax.export
  spec.py      what an export folder holds: file names, the manifest and preprocessing spec, checksums
  runtime.py   load_exported(DIR) -> ExportedModel: numpy in, numpy out, through onnxruntime or jax.export alone
               (imports no flax, optax or orbax; search and serve use it for --model DIR)

Importing this package imports nothing heavy: the runtime stays usable where only numpy and onnxruntime are.
"""
