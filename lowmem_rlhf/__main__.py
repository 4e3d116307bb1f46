"""`python -m lowmem_rlhf ...` is the `lowmem-rlhf` command."""

from lowmem_rlhf.cli import main

main()
