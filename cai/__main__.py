from cai.cli.main import main

raise SystemExit(main())
