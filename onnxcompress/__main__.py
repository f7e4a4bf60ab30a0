import sys

from onnxcompress.cli import main

sys.exit(main())
