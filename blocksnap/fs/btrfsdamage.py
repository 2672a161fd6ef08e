"""The exception of the btrfs adapter: a structure of the image is invalid.

Its own module because both halves of the adapter raise it: `btrfs` (leaf items, file
extents), which imports without the optional extra, and `btrfstree` (superblock and tree
nodes), which imports dissect.btrfs.
"""

from __future__ import annotations


class BtrfsDamage(OSError):
    """A structure of the btrfs image is invalid; the layer above names the path.  An
    OSError, which dissect never catches: its cursors take a ValueError for the end of a
    tree, so a ValueError would cut a listing short without a word."""
