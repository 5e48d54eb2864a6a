"""``python -m gym_plugin.servers.embedded --model tiny``: run the embedded policy server."""

import sys

from gym_plugin.servers.embedded.app import main

sys.exit(main())
