"""Progress bars for every long step (tqdm on stderr); `diet --quiet` turns them all off."""

from __future__ import annotations

from tqdm.auto import tqdm

SETTINGS = {"enabled": True}


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that disappears when done, unless progress is switched off."""
    kwargs.setdefault("leave", False)
    disable = kwargs.pop("disable", False) or not SETTINGS["enabled"]
    return tqdm(iterable, disable=disable, **kwargs)
