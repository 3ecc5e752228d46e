"""keyserver/sqlstore"""
