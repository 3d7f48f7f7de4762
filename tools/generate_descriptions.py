#!/usr/bin/env python
"""Generate LLM descriptions for a corpus (SPEC section 8); see docs/descriptions.md."""

import sys

from rwkvclip_dist.descriptions.cli import main

if __name__ == "__main__":
    sys.exit(main())
