"""Cards for the extra-networks panel: one per hypernetwork file, with its metadata.

Mirrors the built-in Lora page (ExtraNetworksPage subclass: create_item / list_items /
allowed_directories_for_previews); clicking a card inserts ``<unhype:name:multiplier>``.
"""

from __future__ import annotations

import os

from modules import shared, ui_extra_networks
from modules.ui_extra_networks import quote_js

from unhype import infotext
from unhype.errors import UnHypeError

from unhype_webui import files, host


class ExtraNetworksPageUnHype(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("UnHype")

    def refresh(self):
        pass

    def create_item(self, name, index=None, enable_filter=True):
        path = files.list_files().get(name)
        if path is None:
            return None
        stem = os.path.splitext(path)[0]
        try:
            d = files.describe(path)
            description = f"{d['family']}: erases {', '.join(d['concepts']) or '?'}"
        except UnHypeError as exc:
            description = str(exc)
        item = {
            "name": name,
            "filename": path,
            "shorthash": infotext.short_hash(path),
            "preview": self.find_preview(stem),
            "description": self.find_description(stem) or description,
            "search_terms": [self.search_terms_from_path(path)],
            "local_preview": f"{stem}.{shared.opts.samples_format}",
            "metadata": files.raw_metadata(path),
            "sort_keys": {"default": index, **self.get_sort_keys(path)},
            "prompt": quote_js(f"<unhype:{name}:") + " + opts.extra_networks_default_multiplier"
                      " + " + quote_js(">"),
        }
        self.read_user_metadata(item)
        return item

    def list_items(self):
        for index, name in enumerate(list(files.list_files())):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [host.unhype_dir()]
