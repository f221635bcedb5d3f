"""rtlynx.eval"""
