"""Sub-commands of the ``inpo`` CLI; each module defines ``main(argv) -> int``."""
