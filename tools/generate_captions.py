#!/usr/bin/env python
"""Write synthetic captions or tags per image with a vision-language model; see docs/descriptions.md."""

import sys

from rwkvclip_dist.descriptions.caption_cli import main

if __name__ == "__main__":
    sys.exit(main())
