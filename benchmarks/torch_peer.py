"""The peer a user could install: transformers' PyTorch CLIPModel as CLIP4Clip meanP, trained with torch AdamW.

Per clip: the T frames go through CLIPModel's vision tower as T images (SDPA attention), each frame embedding is
L2-normalised, the valid frames are averaged and the mean is L2-normalised (CLIP4Clip's meanP); the text goes
through CLIPModel's text tower (pooled at the first end-of-text token). Loss: the same symmetric NCE as ours,
CE(e^s V T^T) + CE(e^s T V^T). One step = forward, backward, global-norm clipping, torch.optim.AdamW.

The architecture is built from our CLIPConfig through convert.hf_clip.config_to_hf, so both sides train
models of identical shapes; weights are random (throughput does not depend on them).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from clipvip_jax.convert.hf_clip import config_to_hf
from clipvip_jax.models.clip import CLIPConfig


class MeanPPeer:
  """`step(batch)` runs one training step on torch tensors made by `to_torch(batch)`."""

  def __init__(self, cfg: CLIPConfig, *, device: str = "cpu", autocast_dtype: str | None = None,
               attention: str = "sdpa", lr: float = 1e-6, weight_decay: float = 0.2, grad_clip_norm: float = 1.0,
               seed: int = 0, foreach: bool | None = None):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import CLIPConfig as HFConfig, CLIPModel  # pylint: disable=import-outside-toplevel

    self.torch = torch
    torch.manual_seed(seed)
    hf = HFConfig.from_dict(config_to_hf(cfg))
    self.model = CLIPModel._from_config(hf, attn_implementation=attention).to(device)  # pylint: disable=protected-access
    self.model.train()
    self.device = device
    self.autocast_dtype = getattr(torch, autocast_dtype) if autocast_dtype else None
    self.grad_clip_norm = grad_clip_norm
    # CLIP-ViP's AdamW hyper-parameters (b2 0.98, eps 1e-6), decay on every parameter (torch's default grouping).
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                       weight_decay=weight_decay, foreach=foreach)
    self.num_params = sum(p.numel() for p in self.model.parameters())

  def to_torch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Our [B, T, H, W, 3] video -> [B*T, 3, H, W] pixels (NCHW, as CLIPModel takes them), ids/masks as int64."""
    t = self.torch
    video = np.ascontiguousarray(np.transpose(batch["video"], (0, 1, 4, 2, 3)))
    return {"pixels": t.from_numpy(video.reshape(-1, *video.shape[2:])).to(self.device),
            "frame_mask": t.from_numpy(np.asarray(batch["frame_mask"], np.float32)).to(self.device),
            "ids": t.from_numpy(np.asarray(batch["text_ids"], np.int64)).to(self.device),
            "mask": t.from_numpy(np.asarray(batch["text_mask"], np.int64)).to(self.device)}

  def loss(self, b: dict[str, Any]) -> Any:
    t, model = self.torch, self.model
    f = t.nn.functional
    frames = model.visual_projection(model.vision_model(pixel_values=b["pixels"]).pooler_output)
    frames = f.normalize(frames.float(), dim=-1).view(*b["frame_mask"].shape, -1)
    m = b["frame_mask"][..., None]
    video = f.normalize((frames * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)
    text = model.text_projection(model.text_model(input_ids=b["ids"], attention_mask=b["mask"]).pooler_output)
    text = f.normalize(text.float(), dim=-1)
    logits = model.logit_scale.exp() * video @ text.T
    labels = t.arange(logits.shape[0], device=logits.device)
    return f.cross_entropy(logits, labels) + f.cross_entropy(logits.T, labels)

  def step(self, b: dict[str, Any]) -> Any:
    """One step; returns the loss tensor without synchronising (call float() on it to wait for the device)."""
    t = self.torch
    ctx = (t.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)
           if self.autocast_dtype is not None else contextlib.nullcontext())
    with ctx:
      loss = self.loss(b)
    loss.backward()
    if self.grad_clip_norm > 0:
      t.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def synchronize(self) -> None:
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
