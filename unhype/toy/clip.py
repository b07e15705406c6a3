"""The toy CLIP: a tiny text tower and image tower trained contrastively on the toy data.

The text tower is a transformers `CLIPTextModel` with the standard CLIP BPE tokenizer (built
from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`, full 49408-token vocabulary, so any
English prompt tokenizes), loaded and used exactly as Stable Diffusion's: the denoiser attends
to `last_hidden_state` and the hypernetwork reads `pooler_output` (EOS token after the final
layer norm). The image tower (a small CNN, `ImageTower`) and the text projection are kept for
zero-shot judging.

Layout under a weights folder: `tokenizer/`, `text_encoder/` (fp16 on disk), `image_encoder/`,
`clip_head.safetensors` (text projection and logit scale).

Training is CLIP's contrastive loss with multi-positive targets (a caption naming only a shape
matches every image of that shape).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unhype.atomic import atomic_path, atomic_write_text
from unhype.toy import data

MAX_LENGTH = 16
TEXT_DIM = 64
PROJECTION_DIM = 64
BOS, EOS = 49406, 49407


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(out_dir: Path):
    """Write a `CLIPTokenizer` folder equal to OpenAI CLIP's, from open_clip's BPE merges."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + \
        ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), "utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH,
                                  pad_token="<|endoftext|>")
        save_atomic(tokenizer, out_dir)
    return tokenizer


def save_atomic(obj, out_dir: Path, **kwargs) -> None:
    """`obj.save_pretrained` into a temp folder next to `out_dir`, then swap it in."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    obj.save_pretrained(tmp, **kwargs)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        for p in sorted(old.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        old.rmdir()
    else:
        os.replace(tmp, out_dir)


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
                          num_hidden_layers=3, num_attention_heads=4,
                          max_position_embeddings=MAX_LENGTH, projection_dim=PROJECTION_DIM,
                          bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


class ImageTower(nn.Module):
    """Small CNN image encoder -> CLIP embedding. A 16-patch ViT tower learned colour but
    barely shape in the step budget (zero-shot shape 38%), which left the text tower's shape
    words almost collinear (pooled cosine 0.99 between "circle" and "square"); convolutions
    learn shapes in a few hundred steps."""

    def __init__(self, width: int = 32, dim: int = PROJECTION_DIM):
        super().__init__()
        self.config = {"width": width, "dim": dim}

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        w = width
        self.net = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2), *block(w, 2 * w),
                                 *block(2 * w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w),
                                 nn.Flatten(), nn.Linear(4 * w * 16, 4 * w), nn.SiLU(),
                                 nn.Linear(4 * w, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, dim] for images [N, 3, 16, 16] in [0, 1]."""
        return self.net(images * 2 - 1)


def _match_matrix(cap_shape, cap_colour, img_shape, img_colour) -> torch.Tensor:
    """[captions, images] 1 where the caption describes the image (a missing word matches all)."""
    s = (cap_shape[:, None] < 0) | (cap_shape[:, None] == img_shape[None])
    c = (cap_colour[:, None] < 0) | (cap_colour[:, None] == img_colour[None])
    return (s & c).float()


class ToyClip(nn.Module):
    """Both towers, the text projection and the temperature, as trained together."""

    def __init__(self):
        from transformers import CLIPTextModel

        super().__init__()
        self.text = CLIPTextModel(text_config())
        self.text_projection = nn.Linear(TEXT_DIM, PROJECTION_DIM, bias=False)
        self.image = ImageTower()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def logits(self, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """[texts, images] scaled cosine similarities."""
        t = F.normalize(self.text_projection(self.text(input_ids=input_ids).pooler_output), dim=-1)
        i = F.normalize(self.image(images), dim=-1)
        return self.logit_scale.clamp(max=math.log(100)).exp() * t @ i.T


def train_clip(tokenizer, seed: int, steps: int = 500, batch: int = 128, progress=None,
               lr: float = 2e-3) -> ToyClip:
    """Contrastive training with multi-positive targets (many captions fit many images)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ToyClip()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bank, bank_s, bank_c = data.render_batch(8192, rng)
    bank = torch.from_numpy(bank)
    token_cache: dict[str, list[int]] = {}
    model.train()
    for step in range(steps):
        idx = rng.integers(len(bank), size=batch)
        images = bank[idx] + 0.03 * torch.randn(batch, 3, data.RESOLUTION, data.RESOLUTION)
        cap_s, cap_c, texts = [], [], []
        for s, c in zip(bank_s[idx], bank_c[idx]):
            kind = rng.choice(list(data.CAPTION_KIND_P), p=list(data.CAPTION_KIND_P.values()))
            cap_s.append(s if kind != "colour" else -1)
            cap_c.append(c if kind != "shape" else -1)
            texts.append(data.caption(data.SHAPES[s] if kind != "colour" else None,
                                      data.COLOURS[c] if kind != "shape" else None, rng))
        missing = [t for t in texts if t not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", truncation=True).input_ids
            token_cache.update(zip(missing, ids))
        logits = model.logits(torch.tensor([token_cache[t] for t in texts]), images)
        match = _match_matrix(torch.tensor(cap_s), torch.tensor(cap_c),
                              torch.from_numpy(bank_s[idx]), torch.from_numpy(bank_c[idx]))
        loss_t = -(match / match.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        loss_i = -(match / match.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
        loss = (loss_t + loss_i) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


def save_clip(model: ToyClip, out_dir: Path) -> None:
    """text_encoder/ (transformers, fp16), image_encoder/ and clip_head.safetensors."""
    out_dir = Path(out_dir)
    save_atomic(model.text.half(), out_dir / "text_encoder")
    model.text.float()
    image_dir = out_dir / "image_encoder"
    image_dir.mkdir(parents=True, exist_ok=True)
    _save_tensors({k: v for k, v in model.image.state_dict().items()},
                  image_dir / "model.safetensors")
    atomic_write_text(image_dir / "config.json", json.dumps(model.image.config) + "\n")
    _save_tensors({"text_projection.weight": model.text_projection.weight,
                   "logit_scale": model.logit_scale.reshape(1)},
                  out_dir / "clip_head.safetensors")


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))


def load_tokenizer(weights: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(weights) / "tokenizer")


def load_text_encoder(weights: Path, device="cpu"):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(Path(weights) / "text_encoder", torch_dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


class ToyClipParts:
    """The toy CLIP's two towers as the three callables `judge.zero_shot_classify` takes."""

    def __init__(self, weights: Path, device="cpu"):
        from safetensors.torch import load_file

        weights = Path(weights)
        self.device = device
        self.tokenizer_hf = load_tokenizer(weights)
        self.text = load_text_encoder(weights, device)
        config = json.loads((weights / "image_encoder" / "config.json").read_text())
        self.image = ImageTower(**config)
        self.image.load_state_dict(load_file(str(weights / "image_encoder" / "model.safetensors")))
        self.image.to(device).eval().requires_grad_(False)
        head = load_file(str(weights / "clip_head.safetensors"))
        self.text_projection = head["text_projection.weight"].float().to(device)

    def tokenizer(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer_hf(prompts, padding="max_length", truncation=True,
                                 return_tensors="pt").input_ids

    @torch.no_grad()
    def text_encoder(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.text(input_ids=tokens.to(self.device)).pooler_output
        return pooled @ self.text_projection.T

    @torch.no_grad()
    def image_encoder(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(images.to(self.device).float())
