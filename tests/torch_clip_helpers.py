"""PyTorch-side helpers for the converter/API tests: random-weight HF CLIPModels, their reference embeddings,
and the same weights written in OpenAI CLIP's layout (plain state dict and TorchScript archive)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

# Heads = width // 64 everywhere, as OpenAI's loader assumes, so the OpenAI-layout files need no config.
TINY = dict(vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        patch_size=8, image_size=32),
            text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                      vocab_size=1000, max_position_embeddings=16),
            projection_dim=64)
# The real B/32 and B/16 architectures (ViT 768/12/12, text 512/12/8, vocab 49408, 77 positions).
B32 = dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       patch_size=32, image_size=224),
           text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                     vocab_size=49408, max_position_embeddings=77),
           projection_dim=512)
B16 = {**B32, "vision": {**B32["vision"], "patch_size": 16}}


def hf_config(spec: dict) -> transformers.CLIPConfig:
  vocab = spec["text"]["vocab_size"]
  # CLIP's end-of-text token is the highest id; HF pools at the first eos_token_id.
  text = dict(spec["text"], bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
  return transformers.CLIPConfig(text_config=text, vision_config=spec["vision"],
                                 projection_dim=spec["projection_dim"])


def random_clip(spec: dict, seed: int = 0) -> transformers.CLIPModel:
  """A CLIPModel whose every weight is moved off its initial value (LayerNorm gains, biases, logit_scale too),
  so a mis-mapped or transposed tensor shows up as a mismatch."""
  torch.manual_seed(seed)
  model = transformers.CLIPModel(hf_config(spec)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.1 if ("norm" in name or "layrnorm" in name or name == "logit_scale") else 0.02
      p.add_(scale * torch.randn_like(p))
  return model


def inputs(spec: dict, n_images: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images [N, H, W, 3] float32, ids [2, L], mask [2, L]): one short padded text and one full-length text."""
  rng = np.random.RandomState(seed)
  size, vocab, length = spec["vision"]["image_size"], spec["text"]["vocab_size"], spec["text"]["max_position_embeddings"]
  images = rng.randn(n_images, size, size, 3).astype(np.float32)
  ids = np.zeros((2, length), np.int64)
  mask = np.zeros((2, length), np.int64)
  ids[0, :5] = [vocab - 2, *rng.randint(1, vocab - 2, 3), vocab - 1]
  mask[0, :5] = 1
  ids[1] = [vocab - 2, *rng.randint(1, vocab - 2, length - 2), vocab - 1]
  mask[1] = 1
  return images, ids, mask


def torch_embeddings(model: transformers.CLIPModel, images: np.ndarray, ids: np.ndarray,
                     mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised (image, text) embeddings from transformers' PyTorch CLIPModel."""
  def features(out):
    out = getattr(out, "pooler_output", out)  # transformers >= 5 returns a model output here
    return (out / out.norm(dim=-1, keepdim=True)).numpy()
  with torch.no_grad():
    img = features(model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)))
    txt = features(model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)))
  return img, txt


def save_bin_dir(model: transformers.CLIPModel, directory: pathlib.Path) -> pathlib.Path:
  """An HF directory holding pytorch_model.bin (the pre-safetensors format) and config.json."""
  directory.mkdir(parents=True)
  torch.save(model.state_dict(), directory / "pytorch_model.bin")
  model.config.to_json_file(directory / "config.json")
  return directory


def openai_state_dict(model: transformers.CLIPModel) -> dict[str, torch.Tensor]:
  """The same weights in OpenAI CLIP's naming: fused in_proj q/k/v, c_fc/c_proj, `proj` used as x @ W."""
  sd = model.state_dict()
  out = {
      "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
      "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
      "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
      "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
      "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
      "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
      "visual.proj": sd["visual_projection.weight"].T,
      "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
      "ln_final.weight": sd["text_model.final_layer_norm.weight"],
      "ln_final.bias": sd["text_model.final_layer_norm.bias"],
      "text_projection": sd["text_projection.weight"].T,
      "logit_scale": sd["logit_scale"],
  }
  for hf_prefix, oa_prefix in (("vision_model.encoder.layers", "visual.transformer.resblocks"),
                               ("text_model.encoder.layers", "transformer.resblocks")):
    i = 0
    while f"{hf_prefix}.{i}.layer_norm1.weight" in sd:
      h, o = f"{hf_prefix}.{i}", f"{oa_prefix}.{i}"
      out[f"{o}.attn.in_proj_weight"] = torch.cat([sd[f"{h}.self_attn.{p}_proj.weight"] for p in "qkv"])
      out[f"{o}.attn.in_proj_bias"] = torch.cat([sd[f"{h}.self_attn.{p}_proj.bias"] for p in "qkv"])
      out[f"{o}.attn.out_proj.weight"] = sd[f"{h}.self_attn.out_proj.weight"]
      out[f"{o}.attn.out_proj.bias"] = sd[f"{h}.self_attn.out_proj.bias"]
      for ln_hf, ln_oa in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
        out[f"{o}.{ln_oa}.weight"] = sd[f"{h}.{ln_hf}.weight"]
        out[f"{o}.{ln_oa}.bias"] = sd[f"{h}.{ln_hf}.bias"]
      out[f"{o}.mlp.c_fc.weight"] = sd[f"{h}.mlp.fc1.weight"]
      out[f"{o}.mlp.c_fc.bias"] = sd[f"{h}.mlp.fc1.bias"]
      out[f"{o}.mlp.c_proj.weight"] = sd[f"{h}.mlp.fc2.weight"]
      out[f"{o}.mlp.c_proj.bias"] = sd[f"{h}.mlp.fc2.bias"]
      i += 1
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


class _TensorHolder(torch.nn.Module):
  """Root of a scriptable module tree whose parameters/buffers carry a given state dict's names."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def save_torchscript(sd: dict[str, torch.Tensor], path: pathlib.Path, extra_buffers: dict | None = None) -> None:
  """A TorchScript archive (torch.jit.save of a scripted module) whose state_dict() is `sd` (+ extra buffers),
  the container OpenAI ships its CLIP .pt files in; floating tensors become parameters, others buffers."""
  root = _TensorHolder()
  for key, value in {**sd, **(extra_buffers or {})}.items():
    *path_parts, leaf = key.split(".")
    module = root
    for part in path_parts:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    if value.is_floating_point() and key in sd:
      module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    else:
      module.register_buffer(leaf, value.clone())
  torch.jit.save(torch.jit.script(root), str(path))
