"""``python -m yolo_qat <mode> [flags]``: the ``yolo-qat`` command where its script is not on the PATH."""
import sys

from yolo_qat.cli import main

sys.exit(main())
