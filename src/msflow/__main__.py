from msflow.cli import main

raise SystemExit(main())
