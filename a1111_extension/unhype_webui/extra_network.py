"""``<unhype:name:strength>`` as an A1111/Forge extra network.

The host strips the tags from the prompts before conditioning and calls ``activate`` with their
fields (modules/extra_networks.py ExtraNetwork.activate(p, params_list)). Application itself is
per prompt and happens in the sample wrapper (runner.tag_actives reads each prompt's own tags),
so here the tags are only validated and recorded on ``p``.
"""

from __future__ import annotations

from modules import extra_networks

from unhype.errors import UnHypeError
from unhype.prompt_tags import TAG_NAME, parse_tag_items

from unhype_webui import files, host


class ExtraNetworkUnHype(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__(TAG_NAME)

    def activate(self, p, params_list):
        tags, problems = [], []
        for params in params_list:
            try:
                tag = parse_tag_items(params.items, host.default_tag_strength())
                files.resolve(tag.name)
                tags.append(tag)
            except UnHypeError as exc:
                problems.append(str(exc))
        p.unhype_tags = tags
        if problems:
            raise UnHypeError("; ".join(problems))

    def deactivate(self, p):
        pass
