-- sqlserver-login: the login the application's processes use. It reads and writes the
-- pipeline's tables and nothing else; only the migration runs as `sa` (it creates the database
-- and the schema). Safe to run again: it creates what is missing, sets the password and the
-- roles, and maps the database user to the login again (a login dropped and created anew has a
-- new SID, which would leave the user orphaned).
--
-- Besides the two roles the processes need only what every database user has: temporary
-- tables (the `#staging_*` tables of the MERGE statements) and `sp_getapplock` (the
-- reconciler's lock).
--
-- sqlcmd variables: APP_LOGIN, APP_PASSWORD (quotes doubled), DATABASE.

USE [master];
IF SUSER_ID(N'$(APP_LOGIN)') IS NULL
    CREATE LOGIN [$(APP_LOGIN)] WITH PASSWORD = N'$(APP_PASSWORD)', DEFAULT_DATABASE = [$(DATABASE)];
ELSE
    ALTER LOGIN [$(APP_LOGIN)] WITH PASSWORD = N'$(APP_PASSWORD)';
GO

USE [$(DATABASE)];
IF DATABASE_PRINCIPAL_ID(N'$(APP_LOGIN)') IS NULL
    CREATE USER [$(APP_LOGIN)] FOR LOGIN [$(APP_LOGIN)];
ALTER USER [$(APP_LOGIN)] WITH LOGIN = [$(APP_LOGIN)];
ALTER ROLE db_datareader ADD MEMBER [$(APP_LOGIN)];
ALTER ROLE db_datawriter ADD MEMBER [$(APP_LOGIN)];
GO
