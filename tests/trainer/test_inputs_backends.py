"""Bad input fails before training starts; SD2 (v-prediction) and SDXL backends; single files."""

import pytest
import torch

from tests.trainer.conftest import INLINE_CONCEPTS, fast_options, removal_gradient
from unhype.trainer import loop
from unhype.trainer.backends import load_backend
from unhype.trainer.config import resolve
from unhype.errors import UnHypeError
from unhype.fileformat import atomic_save_safetensors, load_hypernet, read_header


def cfg_for(model, out, inline=INLINE_CONCEPTS, **over):
    cfg = resolve(fast_options(model, out, **over))
    cfg.concept_entries = [dict(c) for c in inline] if inline is not None else None
    return cfg


def nothing_written(out):
    return not (out / "checkpoints").exists() and not list(out.glob("*.jsonl")) and \
        not list(out.glob("*.safetensors"))


@pytest.mark.parametrize("over,concepts,needle", [
    ({"pretrained_model_name_or_path": "/no/such/model"}, INLINE_CONCEPTS, "no such file"),
    ({"pretrained_model_name_or_path": ""}, INLINE_CONCEPTS, "no model given"),
    ({"target_preset": "paper"}, INLINE_CONCEPTS, "has no target preset 'paper'"),
    ({"model_family": "sdxl"}, INLINE_CONCEPTS, "holds an sd1 model"),
    ({"model_family": "flux"}, INLINE_CONCEPTS, "not a diffusers FLUX folder"),
    ({}, [], "no concepts"),
    ({}, [{"target": "dog", "anchor": "dog"}], "equals its anchor"),
    ({"retain_prompts": "nosuchset"}, INLINE_CONCEPTS, "not a built-in set"),
])
def test_bad_input_fails_before_training(tiny_sd1, tmp_path, over, concepts, needle):
    cfg = cfg_for(tiny_sd1, tmp_path, concepts, **over)
    with pytest.raises(UnHypeError, match=needle):
        loop.prepare(cfg, quiet=True)
    assert nothing_written(tmp_path)


def test_unreadable_concept_file_and_unwritable_output(tiny_sd1, tmp_path):
    bad = tmp_path / "concepts.yaml"
    bad.write_bytes(b"\x00\xff\xfe not yaml")
    cfg = cfg_for(tiny_sd1, tmp_path / "out", None, concepts=str(bad))
    with pytest.raises(UnHypeError, match="concept file .* cannot read|unreadable"):
        loop.prepare(cfg, quiet=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = cfg_for(tiny_sd1, blocker / "sub")
    with pytest.raises(UnHypeError, match="--output_dir .*cannot create"):
        loop.prepare(cfg, quiet=True)


def test_resume_from_foreign_or_other_run_file(tiny_sd1, tmp_path):
    foreign = tmp_path / "lora.safetensors"
    atomic_save_safetensors({"w": torch.zeros(2)}, foreign, {"ss_network_dim": "4"})
    with pytest.raises(UnHypeError, match="not an UnHype training checkpoint"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path, resume=str(foreign)), quiet=True)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.raises(UnHypeError, match="pickle"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path, resume=str(pickle)), quiet=True)
    with pytest.raises(UnHypeError, match="no checkpoint"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path, resume=str(tmp_path)), quiet=True)
    # a checkpoint of a run with another network shape
    first = tmp_path / "first"
    assert loop.train(loop.prepare(cfg_for(tiny_sd1, first, max_train_steps=1), quiet=True),
                      progress=False) == 0
    with pytest.raises(UnHypeError, match="fingerprint mismatch"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path / "second", network_dim=3,
                             resume=str(first / "checkpoints")), quiet=True)
    with pytest.raises(UnHypeError, match="a finished result"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path / "third",
                             resume=str(first / "erase.safetensors")), quiet=True)


def _corrupt(tensors, meta, case):
    first_net = next(k for k in tensors if k.startswith("hypernet."))
    if case == "missing":
        del tensors[first_net]
    elif case == "nan":
        tensors[first_net] = tensors[first_net].clone().view(-1).index_fill(
            0, torch.tensor([0]), float("nan")).view_as(tensors[first_net])
    elif case == "integer":
        tensors[first_net] = tensors[first_net].to(torch.int64)
    elif case == "shape":
        tensors[first_net] = torch.zeros(tensors[first_net].numel() + 1)
    elif case == "step":
        meta["step"] = "abc"
    elif case == "optimisers":
        meta["optimisers"] = "{not json"
    elif case == "rng":
        del tensors["rng.torch"]
    return tensors, meta


@pytest.mark.parametrize("case,needle", [
    ("missing", "network tensor.* missing"), ("nan", "NaN/Inf"), ("integer", "expected floats"),
    ("shape", "has shape"), ("step", "step 'abc'"), ("optimisers", "not valid JSON"),
    ("rng", "RNG state"), ("truncated", "unreadable data|truncated")])
def test_corrupt_checkpoint_is_named_before_training(tiny_sd1, tmp_path, case, needle):
    """A damaged checkpoint gets 'corrupt checkpoint (what)' from prepare, before any sample
    or step, instead of a traceback, a NaN blamed on the learning rate, or integer weights."""
    from safetensors.torch import load_file, save_file

    from unhype.trainer import checkpoint as ckpt

    first = tmp_path / "first"
    assert loop.train(loop.prepare(cfg_for(tiny_sd1, first, max_train_steps=1), quiet=True),
                      progress=False) == 0
    (saved,) = ckpt.list_checkpoints(first / "checkpoints")
    bad = tmp_path / "bad" / saved.name
    bad.parent.mkdir()
    if case == "truncated":
        bad.write_bytes(saved.read_bytes()[:-64])
    else:
        meta, _ = read_header(saved)
        tensors, meta = _corrupt(load_file(str(saved)), dict(meta), case)
        save_file(tensors, str(bad), meta)  # not the atomic writer: it refuses NaN
    with pytest.raises(UnHypeError, match=f"corrupt checkpoint.*({needle})|{needle}"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path / "again", max_train_steps=2,
                             resume=str(bad)), quiet=True)
    assert nothing_written(tmp_path / "again")


def test_header_length_128_mod_256_is_not_a_pickle(tmp_path):
    for pad in range(0, 300, 7):  # some of these headers have a first byte of 0x80
        path = tmp_path / f"t{pad}.safetensors"
        atomic_save_safetensors({"w": torch.zeros(1)}, path, {"pad": "x" * pad})
        assert read_header(path)[0]["pad"] == "x" * pad


def test_sd2_v_prediction_backend(tiny_sd2, tmp_path):
    cfg = cfg_for(tiny_sd2, tmp_path, max_train_steps=2)
    session = loop.prepare(cfg, quiet=True)
    assert session.backend.family.name == "sd2"
    assert session.backend.prediction_type == "v_prediction"
    assert session.item_emb.shape[1] == 1024
    assert loop.train(session, progress=False) == 0
    meta = load_hypernet(tmp_path / "erase.safetensors").meta
    assert meta.family == "sd2" and meta.training["prediction_type"] == "v_prediction"


def test_v_parameterization_flag(tiny_sd1, tmp_path):
    backend = load_backend(resolve(fast_options(tiny_sd1, tmp_path, v_parameterization=True,
                                                device="cpu")))
    assert backend.prediction_type == "v_prediction"


def test_sdxl_backend(tiny_sdxl, tmp_path):
    cfg = cfg_for(tiny_sdxl, tmp_path, max_train_steps=2, train_batch_size=2)
    session = loop.prepare(cfg, quiet=True)
    b = session.backend
    cond = b.encode(["a dog", "a cat"])
    assert cond.hidden.shape[-1] == 2048  # both encoders' penultimate states
    assert cond.added["text_embeds"].shape == (2, 1280)
    assert cond.added["time_ids"].shape == (2, 6)
    emb = b.embed(["a dog"])
    assert emb.shape == (1, 1280) and torch.allclose(emb, cond.added["text_embeds"][:1], atol=1e-5)
    assert loop.train(session, progress=False) == 0
    meta = load_hypernet(tmp_path / "erase.safetensors").meta
    assert meta.family == "sdxl" and meta.embedding["source"] == "clip_g_pooled_projected"
    assert meta.config.targets[0].name.startswith("lora_unet_")


UNET_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def test_single_file_config_is_a_folder_or_a_fitting_built_in(tiny_sd1, tmp_path):
    """Without --model_config a single file gets the built-in config of the family its header
    shows (and of what it predicts: tests/test_checkpoint_prediction.py); a name or folder that
    does not fit is refused before any weight is read."""
    def checkpoint(name, context):
        path = tmp_path / name
        atomic_save_safetensors({UNET_TO_K: torch.zeros(320, context)}, path, {})
        return path

    unknown = tmp_path / "model.safetensors"
    atomic_save_safetensors({"model.diffusion_model.out.2.bias": torch.zeros(4)}, unknown, {})
    with pytest.raises(UnHypeError, match="no SD 1.x / 2.x / XL UNet found"):
        load_backend(resolve(fast_options(unknown, tmp_path, device="cpu")))
    with pytest.raises(UnHypeError, match="model_index.json missing"):
        load_backend(resolve(fast_options(unknown, tmp_path, device="cpu",
                                          model_config=str(tmp_path))))
    sd2 = checkpoint("sd2.safetensors", 1024)  # no v_pred key, no norm bias: the base config
    with pytest.raises(UnHypeError, match="could not load it with .*sd2-base-v1"):
        load_backend(resolve(fast_options(sd2, tmp_path, device="cpu")))
    with pytest.raises(UnHypeError, match="'sd15' is for sd1, but the checkpoint is sd2"):
        load_backend(resolve(fast_options(sd2, tmp_path, device="cpu", model_config="sd15")))
    with pytest.raises(UnHypeError, match="holds an sdxl UNet, but --model_family sd1"):
        load_backend(resolve(fast_options(checkpoint("xl.safetensors", 2048), tmp_path,
                                          device="cpu", model_family="sd1")))
    inpainting = checkpoint("inpainting.safetensors", 768)
    atomic_save_safetensors({UNET_TO_K: torch.zeros(320, 768), "model.diffusion_model."
                             "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, inpainting, {})
    with pytest.raises(UnHypeError, match="takes 9 input channels \\(an inpainting"):
        load_backend(resolve(fast_options(inpainting, tmp_path, device="cpu")))
    # the built-in SD 1.5 config is used (and a 4-tensor file is not a whole SD 1.5 model)
    with pytest.raises(UnHypeError, match="could not load it with .*sd15-v1"):
        load_backend(resolve(fast_options(checkpoint("sd1.safetensors", 768), tmp_path,
                                          device="cpu")))
    with pytest.raises(UnHypeError, match="only .safetensors"):
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_bytes(b"\x80\x02")
        load_backend(resolve(fast_options(ckpt, tmp_path, device="cpu")))


def test_xformers_missing_is_said_clearly(tiny_sd1, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    loop.prepare(cfg_for(tiny_sd1, tmp_path, xformers=True), quiet=True)
    assert "xformers is not installed; using PyTorch SDPA" in capsys.readouterr().err


def test_probe_lambda_reports_sgd_outcome(tiny_sd1, tmp_path):
    from unhype.trainer.calibrate import probe

    session = loop.prepare(cfg_for(tiny_sd1, tmp_path, hyper_steps=3), quiet=True)
    rows = probe(session, [1e-6, 50.0])
    assert rows[0]["esd_before"] == rows[1]["esd_before"]
    assert abs(rows[0]["esd_after"] - rows[0]["esd_before"]) < 1e-3 * rows[0]["esd_before"]
    assert rows[1]["delta_norm"] > rows[0]["delta_norm"] > 0


def test_sd_gradient_checkpointing_and_bf16(tiny_sd1, tmp_path):
    """Memory options on the SD backend: frozen UNet in bf16, hypernetwork fp32, checkpointed
    blocks really recomputed in the backward, finite losses."""
    run = loop.prepare(cfg_for(tiny_sd1, tmp_path, device="cpu", max_train_steps=2,
                               gradient_checkpointing=True, mixed_precision="bf16"), quiet=True)
    unet = run.backend.unet
    assert unet.is_gradient_checkpointing
    assert next(unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.hypernet.parameters())
    calls = {"n": 0}
    blocks = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]  # diffusers sets it per block
    assert blocks

    def counting(real):
        def counted(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)
        return counted

    for block in blocks:
        block._gradient_checkpointing_func = counting(block._gradient_checkpointing_func)
    assert loop.train(run, progress=False) == 0
    assert calls["n"] > 0
    assert torch.isfinite(torch.tensor([run.log[-1]["remove"], run.log[-1]["esd_T"]])).all()


def test_xformers_that_cannot_run_falls_back_to_sdpa(tiny_sd1, tmp_path, capsys, monkeypatch):
    """Installed but unusable (the PyPI wheel without CUDA kernels, seen on an H200: diffusers'
    check raises NotImplementedError): the run says so and keeps PyTorch's attention."""
    import sys
    import types

    from diffusers import UNet2DConditionModel

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))

    def refuse(self, *args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention", refuse)
    run = loop.prepare(cfg_for(tiny_sd1, tmp_path, xformers=True), quiet=True)
    assert "xformers does not run here (No operator found" in capsys.readouterr().err
    processors = {type(p).__name__ for p in run.backend.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_toy_says_it_ignores_mixed_precision(capsys):
    backend = load_backend(resolve({"pretrained_model_name_or_path": "toy", "device": "cpu",
                                    "mixed_precision": "bf16"}))
    assert backend.dtype == torch.float32
    assert next(backend.unet.parameters()).dtype == torch.float32
    assert "--mixed_precision bf16: the toy models always run in float32" in \
        capsys.readouterr().err


def test_training_on_cuda_keeps_sdpa_off_the_cudnn_kernel():
    """cuDNN attention's backward failed at FLUX.1's shapes on an H200 (docs/training.md): the
    training loop on CUDA allows flash, memory-efficient and math attention only; on the CPU it
    changes nothing, and the flags come back after the loop."""
    cuda = torch.backends.cuda
    assert cuda.cudnn_sdp_enabled()
    with loop.training_attention(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
        assert cuda.math_sdp_enabled()
    assert cuda.cudnn_sdp_enabled()
    with loop.training_attention(torch.device("cpu")):
        assert cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("mode", ["direct", "fields"])
def test_gradient_checkpointing_gives_the_gradients_without_it(tiny_sd1, tmp_path, mode):
    """Direct mode clears the LoRA hooks before the backward; recomputed blocks must still see
    the forward's LoRA (else the backward fails, or silently drops the LoRA's gradient)."""
    grads = {}
    for checkpointing in (False, True):
        run = loop.prepare(cfg_for(tiny_sd1, tmp_path / str(checkpointing), device="cpu",
                                   mode=mode, gradient_checkpointing=checkpointing), quiet=True)
        assert run.backend.unet.is_gradient_checkpointing == checkpointing
        grads[checkpointing] = removal_gradient(run)
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-8)


def test_embedding_of_the_wrong_width_is_refused(tiny_sd1, tmp_path):
    backend = load_backend(resolve(fast_options(tiny_sd1, tmp_path, device="cpu")))
    assert backend.embed(["a dog"]).shape == (1, 768)
    assert backend.checked_embedding(torch.ones(2, 768, dtype=torch.float16)).dtype == torch.float32
    with pytest.raises(UnHypeError, match="gives 1024-d vectors; family sd1 reads"):
        backend.checked_embedding(torch.zeros(2, 1024))


def test_resume_drops_a_half_written_loss_log_line(tiny_sd1, tmp_path, capsys):
    import json

    assert loop.train(loop.prepare(cfg_for(tiny_sd1, tmp_path, max_train_steps=2), quiet=True),
                      progress=False) == 0
    log = tmp_path / "erase-loss.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "remo')  # killed mid-write
    run = loop.prepare(cfg_for(tiny_sd1, tmp_path, max_train_steps=3,
                               resume=str(tmp_path / "checkpoints")), quiet=True)
    assert loop.train(run, progress=False) == 0
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3]
    assert "dropped 1 unreadable line" in capsys.readouterr().err


def test_a_file_that_is_no_base_model_is_named_for_what_it_is(tiny_sd1, tmp_path):
    from tests.helpers import hypernet_for
    from unhype.fileformat import save_hypernet

    hyper = save_hypernet(tmp_path / "erase.safetensors",
                          hypernet_for(load_backend(resolve({
                              "pretrained_model_name_or_path": str(tiny_sd1),
                              "device": "cpu"})).unet), "sd1")
    lora = tmp_path / "lora.safetensors"
    atomic_save_safetensors({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, lora,
                            {"ss_network_dim": "1"})
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, not a model\n")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(hyper.read_bytes()[:2000])
    for path, needle in ((hyper, "an UnHype hypernetwork"), (lora, "this is a LoRA"),
                         (text, "not safetensors"), (truncated, "truncated")):
        with pytest.raises(UnHypeError, match=needle):
            load_backend(resolve({"pretrained_model_name_or_path": str(path), "device": "cpu"}))


@pytest.mark.parametrize("progress", [True, False])
def test_the_work_before_step_one_shows_progress(tiny_sd1, tmp_path, capsys, progress):
    run = loop.prepare(cfg_for(tiny_sd1, tmp_path, max_train_steps=1, latent_cache=1),
                       quiet=True)
    assert loop.train(run, progress=progress) == 0
    err = capsys.readouterr().err
    for bar in ("latent cache: 100%", "sample grids (base model): 100%"):
        assert (bar in err) == progress, bar


def test_a_result_file_that_would_replace_an_input_is_refused(tiny_sd1, tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"stands in for a single-file checkpoint")
    cfg = cfg_for(tiny_sd1, tmp_path, pretrained_model_name_or_path=str(model),
                  output_name="model")
    with pytest.raises(UnHypeError, match="is an input of this command"):
        loop.prepare(cfg, quiet=True)
    (tmp_path / "erase.safetensors").mkdir()
    with pytest.raises(UnHypeError, match="is a folder"):
        loop.prepare(cfg_for(tiny_sd1, tmp_path), quiet=True)
    assert model.read_bytes() == b"stands in for a single-file checkpoint"


def test_an_sdxl_refiner_folder_is_named_as_such(tmp_path):
    """An SDXL refiner (text_time UNet on OpenCLIP-G alone: 1280-d context, no text_encoder) is
    refused for what it is, not as an 'incomplete diffusers folder'."""
    import json

    from diffusers import UNet2DConditionModel

    from unhype.trainer.backends.diffusers_sd import folder_family
    from unhype.trainer.backends.tiny import tiny_unet_config

    config = tiny_unet_config("sdxl")
    time_ids = 5 * config["addition_time_embed_dim"]  # the refiner's 5: aesthetic score
    config.update(cross_attention_dim=1280, projection_class_embeddings_input_dim=1280 + time_ids)
    UNet2DConditionModel.from_config(config).save_config(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(json.dumps({"text_encoder": [None, None]}))
    with pytest.raises(UnHypeError, match="an SDXL refiner"):
        folder_family(tmp_path)
    with pytest.raises(UnHypeError, match="an SDXL refiner"):
        load_backend(resolve(fast_options(tmp_path, tmp_path / "out", device="cpu")))


def test_the_file_records_the_precision_the_base_model_ran_in(tiny_sd1, tmp_path):
    """--mixed_precision bf16 is what an SD model runs in; the toy models ignore it and run in
    float32, and their file says so (inspect showed 'base model bf16 weights')."""
    from unhype.fileformat import read_meta

    sd = loop.prepare(cfg_for(tiny_sd1, tmp_path / "sd", max_train_steps=1,
                              mixed_precision="bf16"), quiet=True)
    assert loop.train(sd, progress=False) == 0
    assert read_meta(sd.result_path).training["mixed_precision"] == "bf16"
    toy = loop.prepare(resolve(fast_options("toy", tmp_path / "toy", max_train_steps=1,
                                            concepts="circle", mixed_precision="bf16")),
                       quiet=True)
    assert loop.train(toy, progress=False) == 0
    assert read_meta(toy.result_path).training["mixed_precision"] == "no"


def test_a_backend_reused_by_a_second_run_carries_one_set_of_hooks(tiny_sd1, tmp_path):
    """Benchmarks and harnesses pass one backend to several runs: each prepare leaves one set
    of LoRA hooks (they piled up, one per run), the earlier run's gradient checkpointing is
    undone when the next run does not ask for it, and a removed hook set holds no factors."""
    first = loop.prepare(cfg_for(tiny_sd1, tmp_path / "a", max_train_steps=1,
                                 gradient_checkpointing=True), quiet=True)
    assert loop.train(first, progress=False) == 0
    unet = first.backend.unet
    hooked = sum(len(m._forward_hooks) for m in unet.modules())
    assert hooked == len(first.hypernet.config.targets) and unet.is_gradient_checkpointing
    second = loop.prepare(cfg_for(tiny_sd1, tmp_path / "b", max_train_steps=1),
                          backend=first.backend, quiet=True)
    assert sum(len(m._forward_hooks) for m in unet.modules()) == hooked
    assert not unet.is_gradient_checkpointing
    assert first.lora._rows.factors is None and first.lora.factors is None
    assert loop.train(second, progress=False) == 0
