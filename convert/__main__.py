import sys

from mlx_flash.convert.cli import main

sys.exit(main())
