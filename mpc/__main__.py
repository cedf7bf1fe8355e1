from mpc.cli import main

raise SystemExit(main())
