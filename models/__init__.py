"""IM-Fuse and the models it is compared with."""
