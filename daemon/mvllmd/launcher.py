"""`python -m mvllmd.launcher STATE_DIR NAME`: the launcher's old module path, kept as a shim.

Units installed by earlier releases (mvllm-instance@.service) run `-m mvllmd.launcher`; mvllmd installs
the template again when it starts, but a unit started before that must still find its launcher. The
launcher itself is mvllmd.instances.launcher.
"""

from __future__ import annotations

import sys

from mvllmd.instances.launcher import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
