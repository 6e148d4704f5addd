from hilomoe.cli import main

raise SystemExit(main())
