"""modules/extra_networks.py: registry (L9-22), ExtraNetworkParams (L29-44), ExtraNetwork
(L47-87), activate (L126-150), re_extra_net + parse_prompt(s) (L175-205)."""

import re
from collections import defaultdict

extra_network_registry = {}


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def activate(p, extra_network_data):
    """Known networks get their params; errors are displayed, not raised (L137-141)."""
    activated = []
    for name, args in extra_network_data.items():
        net = extra_network_registry.get(name)
        if net is None:
            continue
        try:
            net.activate(p, args)
            activated.append(net)
        except Exception as e:  # errors.display(e, ...)
            p.extra_network_errors = getattr(p, "extra_network_errors", []) + [str(e)]
    for name, net in extra_network_registry.items():
        if net not in activated:
            net.activate(p, [])


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data
