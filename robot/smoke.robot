*** Settings ***
Documentation       Smoke test: the installed command runs the example plan end to end.

Library             OperatingSystem
Library             Process


*** Variables ***
${PYTHON}       ${{ sys.executable }}
${COMMAND}      ${{ str(pathlib.Path(sys.executable).with_name("cleveragents")) }}


*** Test Cases ***
The Example Plan Commits Its Rows
    ${folder} =    Create Temporary Folder
    Copy File    ${EXECDIR}/examples/restock.yaml    ${folder}/restock.yaml
    ${result} =    Run Process    ${COMMAND}    run    ${folder}/restock.yaml
    ...    timeout=120s    on_timeout=kill
    Should Be Equal As Integers    ${result.rc}    0    ${result.stderr}
    ${result} =    Run Process    ${PYTHON}    -c
    ...    import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT group_concat(sku || ':' || qty, ' ') FROM (SELECT * FROM items ORDER BY sku)").fetchone()[0])
    ...    ${folder}/inventory.db
    Should Be Equal    ${result.stdout}    apple:12 pear:7 plum:10    ${result.stderr}
    [Teardown]    Remove Directory    ${folder}    recursive=True


*** Keywords ***
Create Temporary Folder
    [Documentation]    Make a new empty folder outside the repository and return its path.
    ${folder} =    Evaluate    tempfile.mkdtemp(prefix="cleveragents-smoke-")    modules=tempfile
    RETURN    ${folder}
