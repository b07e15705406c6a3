"""modules/processing.py + modules/sd_samplers_cfg_denoiser.py, reduced to what decides how
UnHype must behave: the order of script calls in process_images_inner (Forge L907-1022,
L1140-1156; A1111 1.10 the same), ``p.sample(conditioning, unconditional_conditioning, seeds,
subseeds, subseed_strength, prompts)`` (L381/L1342) running the first pass and, for txt2img,
the hires pass inside it (L1428 ``self.sample_hr_pass``, after the hires checkpoint, if any,
became the current model), the refiner switch inside the sampler (``apply_refiner``: load the
refiner checkpoint, ``p.setup_conds()``, go on with the new UNet and conds), and the ways the
UNet is batched:

* ``a1111``: CFGDenoiser.forward with batch_cond_uncond: one call on cat([cond rows, one per
  AND part of each item] + [uncond rows]) (A1111 sd_samplers_cfg_denoiser.py, x_in / cond_in);
* ``a1111_split``: batch_cond_uncond off: calls on chunks of batch_size rows of that layout,
  which can mix cond and uncond rows when AND gives an item several cond rows;
* ``forge``: backend/sampling/sampling_function.py calc_cond_uncond_batch: entries
  concatenated in its own order (uncond first here), a single call; with CFG scale 1 (FLUX's
  usual setting) the uncond rows are skipped and the call has the cond rows alone.

Dict conditioning (SDXL; Forge's FLUX with ``guidance``) reaches the model as Forge's
KModel.apply_model passes it: ``context=crossattn, y=vector, guidance=guidance``; FLUX models
get the timestep as sigma in [0, 1] (Forge PredictionFlux).

As in the real process_images, an exception in sampling skips ``postprocess``.
"""

from dataclasses import dataclass, field

import torch

from modules import devices, extra_networks, infotext_utils, prompt_parser, sd_samplers


def _split_and(prompt):
    import re
    parts = []
    for chunk in re.split(r"\bAND\b", prompt):
        m = re.match(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", chunk)
        parts.append((m[1], float(m[2]) if m[2] else 1.0))
    return parts


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img:
    sd_model: object = None
    prompt: object = ""
    negative_prompt: str = ""
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 2
    sampler_name: str = "Euler"
    hr_sampler_name: str = None
    cfg_scale: float = 7.0
    seed: int = 1
    width: int = 64
    height: int = 64
    enable_hr: bool = False
    hr_prompt: str = ""
    hr_second_pass_steps: int = 0
    hr_checkpoint_name: str = None
    # stand-in of sd_models.reload_model_weights(info=hr_checkpoint_info): the model that
    # becomes shared.sd_model (which p.sd_model reads) before the hires pass
    hr_sd_model: object = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    # stand-in of the checkpoint sd_samplers_common.apply_refiner loads at refiner_switch_at
    refiner_sd_model: object = None
    # CheckpointInfo (.filename) of both, as process_images_inner / p.init set them
    refiner_checkpoint_info: object = None
    hr_checkpoint_info: object = None
    layout: str = "a1111"
    script_args: list = field(default_factory=list)
    scripts: list = field(default_factory=list)
    fail_at_call: int = -1  # raise inside the UNet loop at this call (error / interrupt)

    def __post_init__(self):
        self.extra_generation_params = {}
        self.comments = {}
        self.unet_calls = []
        self.iteration = 0
        self.is_hr_pass = False

    def comment(self, text):
        self.comments[text] = 1

    # --- conditioning -------------------------------------------------------------------
    def _conds(self, prompts, steps, hires_steps=None):
        """[(item, weight, [(end_step, cond [L, D] or dict)])] like prompt_parser.
        get_multicond_learned_conditioning (Forge L253) + reconstruct_multicond_batch (L337);
        as get_learned_conditioning (L158-200), each AND part's schedule texts are encoded
        together in one model call. A hires pass schedules with (first pass's total steps,
        its own), as calculate_hr_conds does (L1584-1592)."""
        out = []
        for i, prompt in enumerate(prompts):
            for text, weight in _split_and(prompt):
                sched = prompt_parser.get_learned_conditioning_prompt_schedules(
                    [text], steps, hires_steps)[0]
                conds = self.sd_model.get_learned_conditioning([t for _, t in sched])
                out.append((i, weight, [(end, _row(conds, k)) for k, (end, _) in
                                        enumerate(sched)]))
        return out

    def _total_steps(self, sampler_name, steps):
        config = sd_samplers.find_sampler_config(sampler_name)
        return config.total_steps(steps) if config else steps

    def setup_conds(self):
        """L490-505: conds scheduled over the sampler's total steps (twice the steps for a
        second-order sampler, whose model calls the schedule counts)."""
        if self.is_hr_pass:  # called by apply_refiner during the hires pass
            self.hr_c = self._conds(self.hr_prompts, self.firstpass_steps, self._hr_steps)
            self.hr_uc = self._conds(self.negative_prompts, self.firstpass_steps, self._hr_steps)
            return
        total_steps = self._total_steps(self.sampler_name, self.steps)
        self.firstpass_steps = total_steps
        self.c = self._conds(self.prompts, total_steps)
        self.uc = self._conds(self.negative_prompts, total_steps)

    # --- sampling ----------------------------------------------------------------------
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
               prompts):
        gen = torch.Generator().manual_seed(self.seed + self.iteration)
        x = torch.randn(len(prompts), 4, 4, 4, generator=gen)
        x = self._run(x, conditioning, unconditional_conditioning, self.firstpass_steps)
        if not self.enable_hr:
            return x
        if self.hr_checkpoint_name not in (None, "Use same checkpoint"):
            self.sd_model = self.hr_sd_model  # reload_model_weights(info=hr_checkpoint_info)
        return self.sample_hr_pass(x, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength,
                       prompts):
        """The second pass (Forge L1501-1506, A1111 1.10 alike): the hires prompts' extra
        networks activated, then the hires conds made, then sampling on them."""
        self.is_hr_pass = True
        if not getattr(self, "disable_extra_networks", False):
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        return self._run(samples, self.hr_c, self.hr_uc, self._hr_steps)

    def calculate_hr_conds(self):
        """The hires conds with the model current now (which encodes the negative prompts
        again when the hires checkpoint is another)."""
        steps = self._hr_steps = self._total_steps(self.hr_sampler_name or self.sampler_name,
                                                   self.hr_second_pass_steps or self.steps)
        self.hr_c = self._conds(self.hr_prompts, self.firstpass_steps, steps)
        self.hr_uc = self._conds(self.negative_prompts, self.firstpass_steps, steps) \
            if self.hr_sd_model is not None else self.uc

    def _apply_refiner(self, step, steps):
        """sd_samplers_common.apply_refiner (A1111 1.10; Forge L166-211): at refiner_switch_at
        of the steps, load the refiner checkpoint, p.setup_conds(), and go on with its UNet
        and the conds just made (CFGDenoiser.update_inner_model)."""
        if self.refiner_sd_model is None or self.sd_model is self.refiner_sd_model \
                or step / steps < self.refiner_switch_at:
            return None
        self.sd_model = self.refiner_sd_model
        self.setup_conds()
        return (self.hr_c, self.hr_uc) if self.is_hr_pass else (self.c, self.uc)

    def _run(self, x, c, uc, steps):
        unet = self.sd_model.unet_for_sampling()
        for step in range(steps):
            switched = self._apply_refiner(step, steps)
            if switched:
                c, uc = switched
                unet = self.sd_model.unet_for_sampling()
            cond_rows = [(i, _at(entries, step)) for i, _, entries in c]
            uncond_rows = [_at(entries, step) for _, _, entries in uc]
            xs = torch.cat([x[i:i + 1] for i, _ in cond_rows])
            cond = _stack([r for _, r in cond_rows])
            uncond = _stack(uncond_rows)
            if self.layout == "forge" and self.cfg_scale == 1:
                # sampling_function: cond_scale 1 -> uncond_ = None, the cond rows alone
                x_in, cond_in = xs, cond
            elif self.layout == "forge":
                x_in, cond_in = torch.cat([x, xs]), _cat([uncond, cond])
            else:
                x_in, cond_in = torch.cat([xs, x]), _cat([cond, uncond])
            t = torch.full((x_in.shape[0],), 999.0 - 300 * step)
            if getattr(self.sd_model, "is_flux", False):  # Forge's PredictionFlux: t = sigma
                t = t / 1000
            if self.layout == "a1111_split":
                bs = len(x)
                out = torch.cat([self._call(unet, x_in[a:a + bs], t[a:a + bs], _sub(cond_in, a, a + bs))
                                 for a in range(0, x_in.shape[0], bs)])
            else:
                out = self._call(unet, x_in, t, cond_in)
            x = x - 0.01 * (out[:len(x)] if self.layout == "forge" else out[-len(x):])
        return x

    def _call(self, unet, x_in, t, cond_in):
        if len(self.unet_calls) == self.fail_at_call:
            raise RuntimeError("simulated failure inside sampling")
        if isinstance(cond_in, dict):  # Forge condition.py: vector -> y, guidance as is
            extra = {"guidance": cond_in["guidance"]} if "guidance" in cond_in else {}
            out = unet(x_in, t, context=cond_in["crossattn"], y=cond_in["vector"], **extra)
        else:
            out = unet(x_in, t, context=cond_in)
        self.unet_calls.append((x_in.detach().clone(), t.clone(), _clone(cond_in),
                                out.detach().clone()))
        return out


def _row(conds, k):
    if isinstance(conds, dict):
        return {key: v[k] for key, v in conds.items()}
    return conds[k]


def _at(entries, step):
    for end, cond in entries:
        if step <= end:
            return cond
    return entries[-1][1]


def _stack(rows):
    """Per-row conds ([L, D] or {crossattn: [L, D], vector: [V]}) -> a batch."""
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def _cat(batches):
    if isinstance(batches[0], dict):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def _sub(cond, a, b):
    return {k: v[a:b] for k, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def _clone(cond):
    return {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()


@dataclass
class Processed:
    infotexts: list
    images: object


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0,
                    position_in_batch=0, use_main_prompt=False, index=None,
                    all_negative_prompts=None):
    if index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    params = {"Steps": p.steps, "Sampler": "Euler", "CFG scale": p.cfg_scale,
              "Seed": p.seed + index, "Size": f"{p.width}x{p.height}",
              **p.extra_generation_params}
    neg = f"\nNegative prompt: {all_negative_prompts[index]}" if p.negative_prompt else ""
    prompt = p.prompt if use_main_prompt else all_prompts[index]
    return f"{prompt}{neg}\n{infotext_utils._generation_params_text(params)}"


def process_images(p):
    n_all = p.batch_size * p.n_iter
    p.all_prompts = list(p.prompt) if isinstance(p.prompt, list) else [p.prompt] * n_all
    p.all_negative_prompts = [p.negative_prompt] * n_all
    p.all_hr_prompts = [p.hr_prompt or x for x in p.all_prompts]
    for script, args in p.scripts:
        try:  # ScriptRunner.process (scripts.py L840-846) only reports what a script raises
            script.process(p, *args)
        except Exception as exc:
            p.script_errors = getattr(p, "script_errors", []) + [exc]
    images = []
    for n in range(p.n_iter):
        p.iteration = n
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts = p.all_prompts[sl]
        p.negative_prompts = p.all_negative_prompts[sl]
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
        if p.enable_hr:
            p.hr_prompts, p.hr_extra_network_data = extra_networks.parse_prompts(
                p.all_hr_prompts[sl])
        extra_networks.activate(p, p.extra_network_data)
        for script, args in p.scripts:
            script.process_batch(p, *args, batch_number=n, prompts=p.prompts)
        p.setup_conds()
        with devices.autocast():  # process_images_inner: the sampling runs in it
            images.append(p.sample(conditioning=p.c, unconditional_conditioning=p.uc,
                                   seeds=None, subseeds=None, subseed_strength=0,
                                   prompts=p.prompts))
    res = Processed([create_infotext(p, p.all_prompts, None, None, index=i)
                     for i in range(n_all)], torch.cat(images))
    for script, args in p.scripts:
        script.postprocess(p, res, *args)
    return res
