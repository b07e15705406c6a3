"""Stand-ins for the parts of AUTOMATIC1111 1.10 / Forge's ``modules`` package that UnHype's
extension uses, with the real signatures. Each file cites the real source it mirrors
(Forge lines at lllyasviel/stable-diffusion-webui-forge dfdcbab6, a fork of A1111 1.10 whose
modules/ keep A1111's API; A1111-only differences are noted where they matter)."""
