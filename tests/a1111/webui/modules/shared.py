"""modules/shared.py: opts (modules/options.py Options(data_labels, restricted_opts): attribute
access to data, add_option L256), OptionInfo (options.py L13, same __init__ signature),
cmd_opts.lora_dir, sd_model."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None,
                 onchange=None, section=None, refresh=None, comment_before='', comment_after='',
                 infotext=None, restrict_api=False, category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = section


class Options:
    def __init__(self, data_labels, restricted_opts):
        object.__setattr__(self, "data_labels", data_labels)
        object.__setattr__(self, "data", {k: v.default for k, v in data_labels.items()})
        object.__setattr__(self, "restricted_opts", restricted_opts)

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


def fresh_options():
    """What initialize.py makes: Options(shared_options.options_templates, restricted_opts),
    with the two built-in options the extension reads."""
    return Options({"extra_networks_default_multiplier": OptionInfo(1.0),
                    "samples_format": OptionInfo("png")}, set())


opts = fresh_options()
cmd_opts = SimpleNamespace(lora_dir=None)
sd_model = None
