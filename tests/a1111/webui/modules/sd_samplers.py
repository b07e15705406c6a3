"""modules/sd_samplers.py find_sampler_config (Forge L25-31; A1111 1.10 the same) with the
SamplerData of sd_samplers_common (L14-21): a second-order sampler calls the model twice a
step, and the web UI schedules prompt editing over those calls (processing.py L494-496:
total_steps = config.total_steps(steps)). The samplers are sd_samplers_kdiffusion's names and
second_order flags."""

from collections import namedtuple

SamplerDataTuple = namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    def total_steps(self, steps):
        if self.options.get("second_order", False):
            steps = steps * 2

        return steps


SECOND_ORDER = ("DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart")
all_samplers = [SamplerData(name, None, [], {"second_order": name in SECOND_ORDER})
                for name in ("DPM++ 2M", "Euler a", "Euler", "DDIM") + SECOND_ORDER]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    if name is not None:
        config = all_samplers_map.get(name, None)
    else:
        config = all_samplers[0]

    return config
