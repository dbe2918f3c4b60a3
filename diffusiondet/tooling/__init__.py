"""The logic behind the command-line tools (``tools/``, ``tools/dev/``) that is shared between
scripts or tested on its own: scripts import it from here instead of from each other.

Tooling only: it may import every layer of ``diffusiondet``, and no layer imports it. It does not
import ``diffusioninst`` either (``diffusiondet`` never does), so the scripts build their configs
themselves and pass them in.
"""
