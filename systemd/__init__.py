"""The systemd unit sources, importable as `mvllmd.units` so an installed mvllmd can read them."""
