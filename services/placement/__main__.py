from services.placement.service import main_cli

main_cli()
