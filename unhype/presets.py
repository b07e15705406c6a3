"""Target-layer presets per kind of model (the module-path suffixes each one adapts), without
torch, so that help texts can name them; unhype.families gives each family its table."""

from __future__ import annotations

SD_PRESETS = {
    "xattn_kv": ("attn2.to_k", "attn2.to_v"),  # the paper's
    "xattn_all": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "attn_all": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
}
# every linear layer of the transformer blocks: attn_all and the feed-forward (GEGLU projection
# in, linear out); the layers SPM's adapters and kohya's UNet LoRAs cover
SD_PRESETS["attn_ff"] = SD_PRESETS["attn_all"] + ("ff.net.0.proj", "ff.net.2")
SD_DEFAULT = "xattn_kv"

FLUX_PRESETS = {
    "paper": ("attn.to_v", "attn.add_v_proj", "attn.to_out.0"),  # value + output projections
    "attn_v_out_all": ("attn.to_v", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out"),
    "attn_all": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
}
FLUX_DEFAULT = "paper"

# the families of each table (unhype.families registers them with it)
SD_FAMILIES = ("sd1", "sd2", "sdxl", "toy")
FLUX_FAMILIES = ("flux", "toy_flux")


def presets_help() -> str:
    """`--target_preset`'s names per family, the default first."""
    def names(table, default):
        return ", ".join([f"{default} (default)"] + [p for p in table if p != default])

    return (f"{' / '.join(SD_FAMILIES)}: {names(SD_PRESETS, SD_DEFAULT)}; "
            f"{' / '.join(FLUX_FAMILIES)}: {names(FLUX_PRESETS, FLUX_DEFAULT)}")
