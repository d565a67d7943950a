from cai.cli import main

raise SystemExit(main())
