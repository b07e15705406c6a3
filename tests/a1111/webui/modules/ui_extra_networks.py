"""modules/ui_extra_networks.py: register_page (Forge L89), quote_js (L180), ExtraNetworksPage
(L186-): __init__(title), find_preview/find_description/search_terms_from_path/get_sort_keys/
read_user_metadata used by create_item."""

import os

pages = []


def register_page(page):
    pages.append(page)


def quote_js(s):
    s = s.replace('\\', '\\\\').replace('"', '\\"')
    return f'"{s}"'


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()

    def read_user_metadata(self, item, use_cache=True):
        item["user_metadata"] = {}

    def search_terms_from_path(self, filename, possible_directories=None):
        return os.path.abspath(filename)

    def find_preview(self, path):
        return None

    def find_description(self, path):
        return None

    def get_sort_keys(self, path):
        return {"name": os.path.basename(path).lower()}
