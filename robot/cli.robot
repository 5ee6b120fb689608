*** Settings ***
Documentation     The installed ``cleveragents`` command, end to end, on temporary copies of
...               the example plans. Databases are read through a separate sqlite3 connection.

Library           CleverAgentsLibrary.py

Suite Teardown    Close All Handlers
Test Setup        Copy The Examples


*** Variables ***
${EXAMPLES}     ${EMPTY}
${INVENTORY}    ${EMPTY}
${ITEMS}        SELECT group_concat(sku || '=' || qty, ',') FROM (SELECT * FROM items ORDER BY sku)


*** Test Cases ***
A Completed Plan Is Committed
    [Documentation]    restock.yaml completes: exit 0 and its rows are in the database.
    ${result}=    Run Cleveragents    run    restock.yaml    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    Output Should Contain    ${result}    plan restock: completed
    Query Value Should Be    ${INVENTORY}    ${ITEMS}    apple=12,pear=7,plum=10

A Failed Plan Leaves The Database Exactly As It Was
    [Documentation]    sell-too-much.yaml fails: exit 1 and a full dump of the database is unchanged.
    ${result}=    Run Cleveragents    run    restock.yaml    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    ${before}=    Dump Database    ${INVENTORY}
    ${result}=    Run Cleveragents    run    sell-too-much.yaml    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    1
    Output Should Contain    ${result}    plan sell-too-much: failed
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    ${after}=    Dump Database    ${INVENTORY}
    Dumps Should Be Equal    ${before}    ${after}
    Table Should Not Exist    ${INVENTORY}    sales

A Plugin Tool Writes Inside The Plan's Transaction
    [Documentation]    The example plugin's send_report tool commits its row with the plan.
    ${result}=    Run Cleveragents    run    restock.yaml    report.yaml    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    Query Value Should Be
    ...    ${INVENTORY}
    ...    SELECT count(*) FROM reports WHERE plan = 'report' AND channel = 'ops'
    ...    1

JSON Output Has One Line Per Plan With Every Field
    [Documentation]    ``run --json`` prints one object per plan with plan, status, failed_step, error, steps.
    ${result}=    Run Cleveragents    run    --json    restock.yaml    sell-too-much.yaml
    ...    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    1
    ${records}=    Parse JSON Lines    ${result}
    Length Should Be    ${records}    2
    Plan Result Should Be    ${records}    restock    completed
    Plan Result Should Be    ${records}    sell-too-much    failed    failed_step=sell-pears
    Query Value Should Be    ${INVENTORY}    ${ITEMS}    apple=12,pear=7,plum=10

Parallel Plans On One Database Keep Exactly The Committed Work
    [Documentation]    ``--parallel 4``, one shared database: committed rows present, failed ones absent.
    ${plans}=    Write Ledger Plans    ${EXAMPLES}    12    fail_every=3
    ${result}=    Run Cleveragents    run    --parallel    4    --json    @{plans}[paths]
    ...    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    1
    ${records}=    Parse JSON Lines    ${result}
    Length Should Be    ${records}    12
    FOR    ${plan}    IN    @{plans}[committed]
        Plan Result Should Be    ${records}    ${plan}    completed
    END
    FOR    ${plan}    IN    @{plans}[failed]
        Plan Result Should Be    ${records}    ${plan}    failed    failed_step=check
    END
    Ledger Should Contain Plans    ${plans}[database]    @{plans}[committed]
    Ledger Should Not Contain Plans    ${plans}[database]    @{plans}[failed]
    Query Value Should Be    ${plans}[database]    SELECT count(*) FROM ledger    24

Validate Checks Plans Without Touching Any Resource
    [Documentation]    ``validate`` exits 0 for good plans, 2 for a bad one, and creates no database.
    ${result}=    Run Cleveragents    validate    restock.yaml    sell-too-much.yaml    report.yaml
    ...    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    Output Should Contain    ${result}    restock.yaml: ok (4 steps)
    Database Should Not Exist    ${INVENTORY}
    ${bad}=    Write Bad Plans    ${EXAMPLES}
    ${result}=    Run Cleveragents    validate    restock.yaml    ${bad}[0][path]    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    2
    Stderr Should Report Problem    ${result}    ${bad}[0][path]    ${bad}[0][line]    ${bad}[0][field]
    Database Should Not Exist    ${INVENTORY}

Plugins Lists The Example Plugin's Tool
    [Documentation]    ``plugins`` lists send_report with the distribution it comes from.
    ${result}=    Run Cleveragents    plugins    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    Output Should Contain    ${result}    send_report
    ${result}=    Run Cleveragents    plugins    --json    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    ${listing}=    Parse JSON Output    ${result}
    ${tools}=    Evaluate    {tool['name']: tool['source'] for tool in $listing['tools']}
    Should Contain    ${tools}    send_report
    Should Contain    ${tools}[send_report]    cleveragents-example-report

Schema Is A JSON Schema Of Plan Files
    [Documentation]    ``schema`` prints valid JSON describing plan files.
    ${result}=    Run Cleveragents    schema    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    ${schema}=    Parse JSON Output    ${result}
    Should Be Equal    ${schema}[type]    object
    Should Contain    ${schema}[properties]    steps
    Should Contain    ${schema}[properties]    resources

Bad Plans Exit 2 Naming File, Line And Field, And Run Nothing
    [Documentation]    Every kind of bad input gets ``PATH:LINE: FIELD: problem``, exit 2, no traceback, no plan run.
    ${bad}=    Write Bad Plans    ${EXAMPLES}
    ${paths}=    Evaluate    [plan['path'] for plan in $bad]
    ${result}=    Run Cleveragents    run    restock.yaml    @{paths}    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    2
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    Every Stderr Line Should Name A Plan File    ${result}
    FOR    ${plan}    IN    @{bad}
        Stderr Should Report Problem    ${result}    ${plan}[path]    ${plan}[line]    ${plan}[field]
        ...    msg=${plan}[problem] is not reported as PATH:LINE: FIELD: in ${result.stderr}
        Database Should Not Exist    ${plan}[database]
    END
    Database Should Not Exist    ${INVENTORY}
    Should Be Empty    ${result.stdout}

A Location Outside The Allowed Folders Needs An Allowed Root
    [Documentation]    A database outside the plan's and the working folder is bad input unless allowed.
    ${outside}=    Create Temporary Folder
    ${plan}=    Write Ledger Plan    ${EXAMPLES}    outside    location=${outside}/ledger.db
    ${result}=    Run Cleveragents    run    ${plan}    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    2
    Output Should Contain    ${result}    ${plan}:7: resources.ledger.location:    stream=stderr
    Output Should Contain    ${result}    outside the allowed folders    stream=stderr
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    Database Should Not Exist    ${outside}/ledger.db
    ${result}=    Run Cleveragents    run    --allow-root    ${outside}    ${plan}    cwd=${EXAMPLES}
    Exit Code Should Be    ${result}    0
    Ledger Should Contain Plans    ${outside}/ledger.db    outside
    ${result}=    Run Cleveragents    validate    ${plan}    cwd=${EXAMPLES}
    ...    CLEVERAGENTS_ALLOWED_ROOTS=${outside}
    Exit Code Should Be    ${result}    0

A Failing Subscriber Never Stops The Commit Or The Rollback
    [Documentation]    A plugin failing on a plan event is reported; the database outcome stays right.
    ${result}=    Run Cleveragents    run    restock.yaml    cwd=${EXAMPLES}
    ...    CLEVERAGENTS_EXAMPLE_FAIL_ON=completed
    Exit Code Should Be    ${result}    0
    Output Should Contain    ${result}    example subscriber fails on completed    stream=stderr
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    Query Value Should Be    ${INVENTORY}    ${ITEMS}    apple=12,pear=7,plum=10
    ${before}=    Dump Database    ${INVENTORY}
    ${result}=    Run Cleveragents    run    sell-too-much.yaml    cwd=${EXAMPLES}
    ...    CLEVERAGENTS_EXAMPLE_FAIL_ON=failed
    Exit Code Should Be    ${result}    1
    Output Should Contain    ${result}    example subscriber fails on failed    stream=stderr
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    ${after}=    Dump Database    ${INVENTORY}
    Dumps Should Be Equal    ${before}    ${after}

A Signal Interrupts The Running Statement And Rolls The Plan Back
    [Documentation]    SIGINT/SIGTERM stop a long statement: exit 128 + signal, no traceback, nothing kept.
    [Template]    Interrupting A Slow Plan Should Roll It Back
    SIGINT    130
    SIGTERM    143


*** Keywords ***
Copy The Examples
    [Documentation]    Give the test its own copy of the examples, without any database.
    ${folder}=    Copy Examples
    VAR    ${EXAMPLES}    ${folder}    scope=TEST
    VAR    ${INVENTORY}    ${folder}/inventory.db    scope=TEST

Interrupting A Slow Plan Should Roll It Back
    [Documentation]    Send ${signal} while plan ``slow`` runs a statement that would take minutes.
    [Arguments]    ${signal}    ${status}
    ${database}=    Create Ledger Database    ${EXAMPLES}
    ${plan}=    Write Slow Plan    ${EXAMPLES}
    ${before}=    Dump Database    ${database}
    VAR    ${events}    ${EXAMPLES}/events-${signal}.jsonl
    Start Cleveragents    run    ${plan}    cwd=${EXAMPLES}    CLEVERAGENTS_EXAMPLE_EVENTS=${events}
    Wait Until File Contains    ${events}    "started"
    Sleep    0.5s    reason=Let the slow statement start; the outcome is the same if it has not.
    Send Signal To Cleveragents    ${signal}
    ${result}=    Wait For Cleveragents    timeout=30
    Exit Code Should Be    ${result}    ${status}
    Output Should Contain    ${result}    interrupted by ${signal}    stream=stderr
    Output Should Not Contain    ${result}    Traceback    stream=stderr
    Wait Until File Contains    ${events}    "failed"    timeout=0
    ${after}=    Dump Database    ${database}
    Dumps Should Be Equal    ${before}    ${after}
