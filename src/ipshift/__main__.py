from ipshift.cli import main

raise SystemExit(main())
