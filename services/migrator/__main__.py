from services.migrator.service import main_cli

main_cli()
