from moe_runtime.core.cli import main

raise SystemExit(main())
