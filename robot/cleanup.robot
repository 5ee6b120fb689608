*** Settings ***
Documentation     Long-running cleanup (issue 3), through the Python API in this process:
...               thousands of plans on one database file, some of them forgotten. Nothing may
...               leak: forgotten plans are reaped, file descriptors stay bounded and come back
...               to the baseline, and no thread is left behind.

Library           CleverAgentsLibrary.py

Suite Teardown    Close All Handlers


*** Variables ***
${PLANS}              3000
${TTL}                0.5
${MAX_CONNECTIONS}    8
${THREADS}            4
${ROLLBACK_EVERY}     4
${FORGET_EVERY}       150


*** Test Cases ***
Thousands Of Plans On One File Leave Nothing Behind
    [Documentation]    Committed, rolled-back and forgotten plans from ${THREADS} threads on one
    ...    file: forgotten plans are reaped within TTL + 1 s, and closing frees everything.
    ${folder}=    Create Temporary Folder
    ${database}=    Create Ledger Database    ${folder}
    ${baseline}=    Count Open Descriptors
    Open Handler    long    max_connections=${MAX_CONNECTIONS}    checkpoint_ttl=${TTL}
    ${summary}=    Run Plan Workload    long    ${database}    plans=${PLANS}
    ...    rollback_every=${ROLLBACK_EVERY}    forget_every=${FORGET_EVERY}    threads=${THREADS}
    Should Be True    ${summary}[forgotten_writers] > 0 and ${summary}[forgotten_readers] > 0
    Reaper Thread Should Be Running    long
    Forgotten Plans Should Be Reaped Within    long    ${{ ${TTL} + 1 }}
    Every Plan Should Have Ended As Planned    long    ${summary}
    ${peak}=    Peak Open Descriptors
    Peak Open Descriptors Should Be At Most    ${{ ${baseline} + 2 * ${MAX_CONNECTIONS} + 3 }}
    Peak Open Connections Should Be At Most    ${MAX_CONNECTIONS}
    Close Handler    long
    ${final}=    Count Open Descriptors
    Log    file descriptors: baseline ${baseline}, peak ${peak}, after close ${final}    console=True
    Nothing Of The Handler Should Be Left    long    ${baseline}

A Handler Dropped Without Close Is Collected And Frees Its Descriptors
    [Documentation]    A handler nobody closed, with open plans and idle connections, is
    ...    collected: its plans are rolled back and its descriptors and thread are freed.
    ${folder}=    Create Temporary Folder
    ${database}=    Create Ledger Database    ${folder}
    ${baseline}=    Count Open Descriptors
    Open Handler    dropped    max_connections=${MAX_CONNECTIONS}    checkpoint_ttl=60
    Leave Plans Open    dropped    ${database}    committed=3    readers=3
    Open Descriptors Should Be Above    ${baseline}
    Reaper Thread Should Be Running    dropped
    Drop Handler Without Closing    dropped
    Handler Should Have Been Collected    dropped
    Open Descriptors Should Be    ${baseline}
    No Reaper Thread Should Be Left    dropped
    Ledger Should Contain Plans    ${database}    dropped-committed-0    dropped-committed-1
    ...    dropped-committed-2    rows=1
    Ledger Should Not Contain Plans    ${database}    dropped-open-writer


*** Keywords ***
Every Plan Should Have Ended As Planned
    [Documentation]    The counters and the ledger agree with how each plan of the workload ended.
    [Arguments]    ${alias}    ${summary}
    Handler Stat Should Be    ${alias}    reaped    ${summary}[forgotten]
    Handler Stat Should Be    ${alias}    commits    ${summary}[committed]
    Handler Stat Should Be    ${alias}    rollbacks    ${{ ${summary}[rolled_back] + ${summary}[forgotten] }}
    Handler Stat Should Be    ${alias}    active_plans    0
    Handler Stat Should Be    ${alias}    checkpoints    0
    Ledger Should Match Workload    ${alias}
    Forgotten Plans Should Raise Expired Once    ${alias}

Nothing Of The Handler Should Be Left
    [Documentation]    After close: descriptors back at the baseline, no reaper thread, no more work.
    [Arguments]    ${alias}    ${baseline}
    Open Descriptors Should Be    ${baseline}
    No Reaper Thread Should Be Left    ${alias}
    Closed Handler Should Refuse Work    ${alias}
