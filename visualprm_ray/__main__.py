from visualprm_ray.cli import main

raise SystemExit(main())
