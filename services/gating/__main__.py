from services.gating.service import main_cli

main_cli()
